"""Config, the tuned defaults table and set_num_sms (CPU tier)."""

import json

import pytest

import deepep_cupy as ep
from deepep_cupy.config import settings


def test_tuned_table_defaults(monkeypatch, tmp_path):
    table = {"dispatch": {"2": {"num_sms": 24}, "8": {"num_sms": 32}}, "combine": {"2": {"num_sms": 20}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(settings, "tuned_configs_path", str(path))
    monkeypatch.setattr(settings, "num_sms", None)
    assert ep.Buffer.get_dispatch_config(2).num_sms == 24
    assert ep.Buffer.get_dispatch_config(4).num_sms == 24     # nearest smaller entry
    assert ep.Buffer.get_dispatch_config(8).num_sms == 32
    assert ep.Buffer.get_combine_config(16).num_sms == 20
    ep.Buffer.set_num_sms(12)
    assert ep.Buffer.get_dispatch_config(8).num_sms == 12
    with pytest.raises(ValueError, match="num_sms"):
        ep.Buffer.set_num_sms(7)


def test_shipped_table_is_valid():
    for kind in ("dispatch", "combine"):
        for r in (2, 4, 8):
            cfg = ep.Buffer.get_dispatch_config(r) if kind == "dispatch" else ep.Buffer.get_combine_config(r)
            assert cfg.num_sms >= 2 and cfg.num_sms % 2 == 0


def test_intranode_size_hint_grows_with_tokens_and_ranks():
    small = ep.Buffer.get_intranode_size_hint(128, 7168, 2)
    big = ep.Buffer.get_intranode_size_hint(4096, 7168, 2)
    wide = ep.Buffer.get_intranode_size_hint(4096, 7168, 8)
    assert small < big < wide
    # 4096 x 7168 bf16 rows with metadata, one slot each for dispatch and combine: about 113 MiB
    assert 110 << 20 < big < 120 << 20
    with pytest.raises(ValueError, match="num_topk"):
        ep.Buffer.get_intranode_size_hint(1, 128, 2, num_topk=64)
