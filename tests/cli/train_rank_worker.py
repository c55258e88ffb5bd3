"""One rank of test_data_parallel.py: `sparsekern train` with the arguments after the first (run under
torch.distributed.run), which also saves this rank's final model state and how often it wrote --out to
<first argument>/rank<r>.pt. The command line writes only rank 0's state: this shows the other ranks'."""
import os
import sys

import torch

from sparsekern.cli import main, training


def run(folder: str, argv: list[str]) -> None:
    rank = int(os.environ["RANK"])
    saves = []
    real_train, real_save = training.Run.train, training.Run.save

    def save(self, out_dir):
        saves.append(self.epoch)
        real_save(self, out_dir)

    def train(self, *args, **kwargs):
        result = real_train(self, *args, **kwargs)
        torch.save({"model": self.model.state_dict(), "saves": saves}, os.path.join(folder, f"rank{rank}.pt"))
        return result

    training.Run.save, training.Run.train = save, train
    main(argv)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
