"""The per-epoch line a person reads: units, normaliser, ETA."""

from __future__ import annotations

from flare.platform.progress import EpochPrinter, duration, epoch_line


def test_epoch_line_labels_units_and_normaliser() -> None:
    m = {"epoch": 2, "train_total": 0.012345, "val_nme": 0.04234, "images_per_s": 411.6, "data_wait": 0.031}
    line = epoch_line(m, 14, "inter-ocular", eta_s=724)
    assert line == ("epoch 3/14  train loss 0.01235  val NME (inter-ocular) 4.23%  412 img/s  data wait 3%  "
                    "ETA 12m04s")
    assert epoch_line({"epoch": 0}, 1) == "epoch 1/1"


def test_duration_and_printer_eta() -> None:
    assert (duration(9.4), duration(61), duration(3 * 3600 + 5 * 60)) == ("9s", "1m01s", "3h05m")
    lines: list[str] = []
    printer = EpochPrinter(4, log=lines.append)
    printer({"epoch": 0, "val_nme": 0.1})
    printer({"epoch": 3, "val_nme": 0.05})
    assert lines[0].startswith("epoch 1/4  val NME (inter-ocular) 10.00%  ETA ")
    assert lines[1].endswith("ETA 0s")
