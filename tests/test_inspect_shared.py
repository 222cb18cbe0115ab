"""``deltatune inspect`` on files with a method's model-level tensors (VeRA's saved projections)."""

from __future__ import annotations

import warnings

import peft

from deltatune.cli.inspect_adapter import inspect_command
from conftest import tiny_llama


def test_inspect_calls_a_peft_vera_file_with_its_projections_peft_format(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  save_projection=True))
        model.save_pretrained(str(tmp_path))
    report = inspect_command(str(tmp_path))
    assert "peft format:  yes" in report, report
