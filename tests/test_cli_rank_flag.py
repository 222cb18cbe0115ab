"""``--rank``: the adapter rank flag that survives ``torchrun`` (which takes ``--r`` as an ambiguous prefix)."""

from __future__ import annotations

import pytest
from torch.distributed.run import get_args_parser

from deltatune.cli import build_parser
from deltatune.cli.options import given_options, resolve


def test_rank_reaches_deltatune_through_torchrun_where_r_does_not():
    torchrun = get_args_parser()
    with pytest.raises(SystemExit):
        torchrun.parse_args(["--nproc_per_node=2", "-m", "deltatune", "train", "--r", "4"])
    args = torchrun.parse_args(["--nproc_per_node=2", "-m", "deltatune", "train", "--rank", "4"])
    assert args.training_script_args == ["train", "--rank", "4"]
    ours = build_parser().parse_args(args.training_script_args)
    assert resolve(ours, given_options(ours)).r == 4
    plain = build_parser().parse_args(["train", "--r", "16"])
    assert resolve(plain, given_options(plain)).r == 16
