"""One rank of the 2-process calibration test: python _calibration_ddp_worker.py RANK PORT OUT_FILE."""

import sys

import torch
from test_calibration import _TwoLayer  # this script's directory is on sys.path
from torch.utils.data import DataLoader

from lit_factor.compress.calibration import calibrate, calibration_loader


class Data:
    """A datamodule as calibration sees it: a train_dataloader with a dataset and a collate function."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        rows = [{"x": torch.randn(5, 4, generator=g)} for _ in range(10)]
        return DataLoader(rows, batch_size=3, shuffle=True)


def main(rank: int, port: int, out: str) -> None:
    if rank >= 0:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    torch.manual_seed(0)  # the same weights on every rank (DDP would broadcast them)
    model = _TwoLayer()
    loader = calibration_loader(Data(), samples=10)
    stats = calibrate(model, ["a", "b"], loader, forward=model, fisher=True)
    torch.save({"share": len(loader.dataset), **{p: (s.input_cov, s.row_weights) for p, s in stats.items()}}, out)
    if rank >= 0:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
