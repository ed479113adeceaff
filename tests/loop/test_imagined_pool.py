"""data.imagined_weight: where the bootstrap's conversations are found."""

from __future__ import annotations

import pytest


def test_imagined_buffer_is_the_bootstraps_own_or_named(tmp_path):
    from iterppo_lightning.loop.controller import imagined_buffer
    from iterppo_lightning.loop.run_dir import RunFolder

    folder = RunFolder(tmp_path / "run", None)
    (tmp_path / "boot" / "policy").mkdir(parents=True)
    with pytest.raises(ValueError, match="data.imagined_buffer"):
        imagined_buffer(None, folder, str(tmp_path / "boot" / "policy"))
    (tmp_path / "boot" / "buffer").mkdir()
    assert imagined_buffer(None, folder, str(tmp_path / "boot" / "policy")) == tmp_path / "boot" / "buffer"
    (folder.pi0_dir / "buffer").mkdir(parents=True)
    assert imagined_buffer(None, folder, None) == folder.pi0_dir / "buffer"  # a run that bootstrapped pi_0 itself
    assert imagined_buffer(str(tmp_path / "boot" / "buffer"), folder, None) == tmp_path / "boot" / "buffer"
