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
    # 4096 x 7168 bf16 rows with metadata: one staging slot (~57 MiB) and a receive arena for two
    # worst-case receives of 2 x 4096 rows (~226 MiB) plus 64 rows a rank: about 284 MiB
    assert 280 << 20 < big < 290 << 20
    with pytest.raises(ValueError, match="num_topk"):
        ep.Buffer.get_intranode_size_hint(1, 128, 2, num_topk=64)


def test_low_latency_size_hint_and_layout():
    from deepep_cupy.low_latency import LowLatencyLayout
    hint = ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 2, 256)
    assert hint < 1908 * 10**6 // 10           # DeepEP's hint at this shape is 1908 MB
    lay = LowLatencyLayout.build(128, 7168, 2, 256)
    assert hint == lay.total_bytes == 2 * lay.half_bytes + 256    # + the control word, 256-aligned
    assert lay.control == 2 * lay.half_bytes
    regions = sorted([(lay.recv_msgs, 2 * 128 * lay.msg_bytes), (lay.recv_meta, 2 * lay.meta_ints * 4),
                      (lay.recv_flags, 16), (lay.combine_rows, 128 * 16 * 7168 * 2), (lay.combine_flags, 16),
                      (lay.send_msgs, 128 * lay.msg_bytes), (lay.combine_stage, 2 * 128 * 16 * 7168 * 2),
                      (lay.meta_stage, 2 * lay.meta_ints * 4), (lay.combine_arrived, 128 * 8)])
    for (a, size), (b, _) in zip(regions, regions[1:]):
        assert a % 256 == 0 and a + size <= b, "regions overlap or are misaligned"
    assert regions[-1][0] + regions[-1][1] <= lay.half_bytes
    assert lay.msg_bytes % 16 == 0 and lay.msg_bytes >= 16 + 8 * 16 + 7168 * 2
    with pytest.raises(ValueError, match="num_experts"):
        ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 3, 256)


def test_every_kernel_phase_has_a_name():
    """Each phase id a kernel can report (constexpr int kPhase... in cuda_src) is named in
    kernel_errors.PHASES, so a timeout message names the phase, not a number."""
    import re
    from pathlib import Path
    from deepep_cupy.kernel_errors import PHASES
    root = Path(__file__).resolve().parents[1] / "cuda_src"
    ids = {int(m.group(2)) for f in root.rglob("*.cu*")
           for m in re.finditer(r"constexpr int (kPhase\w+) = (\d+);", f.read_text())}
    assert len(ids) >= 12, ids
    assert ids <= set(PHASES), f"phases without a name: {sorted(ids - set(PHASES))}"


def test_internode_size_hint_is_both_teams_staging():
    """(num_nvl_bytes, num_rdma_bytes): the NVLink team's staging holds num_nodes * T rows per slot
    (what a forwarder can receive), the RDMA team's T rows per slot."""
    from deepep_cupy.intranode import size_hint
    nvl, rdma = ep.Buffer.get_internode_size_hint(4096, 7168, 4, 2, 8)
    assert nvl == size_hint(2, 2 * 4096, 7168, 8) and rdma == size_hint(2, 4096, 7168, 8, send_area=True)
    assert rdma > 1.4 * size_hint(2, 4096, 7168, 8)     # the puts' send area: a third staging area
    assert ep.Buffer.get_internode_size_hint(4096, 7168, 16, 8, 8)[0] > 6 * nvl   # 7 slots, not 1
    with pytest.raises(ValueError, match="ranks_per_node"):
        ep.Buffer.get_internode_size_hint(128, 7168, 6, 4)
    with pytest.raises(ValueError, match="num_max_tokens_per_rank"):
        ep.Buffer.get_internode_size_hint(0, 7168, 4, 2)


def test_team_errors_name_global_ranks_and_the_stage():
    """A stage's kernels number ranks inside their team; the exception names global ranks."""
    from deepep_cupy.errors import DeepEPError, DeepEPTimeout
    from deepep_cupy.kernel_errors import raise_if_error, team_to_global
    team = [1, 3]                                          # local index 1 on two nodes of two
    assert team_to_global([1, 10, 0, 1], team) == [1, 10, 1, 3]
    assert team_to_global([1, 10, -1, 0], team) == [1, 10, -1, 1]    # an unknown peer stays unknown
    assert team_to_global([2, 22, 7, 0], team) == [2, 22, 7, 1]      # phase 22's peer is an expert id
    with pytest.raises(DeepEPTimeout, match=r"dispatch \[internode RDMA stage\]: rank 3 .* waiting on rank 1"):
        raise_if_error(team_to_global([1, 10, 0, 1], team), "dispatch [internode RDMA stage]")
    with pytest.raises(DeepEPError, match="num_worst_tokens"):
        raise_if_error(team_to_global([2, 15, 0, 1], team), "dispatch")


def test_check_values_is_off_by_default(monkeypatch):
    """No host wait by default: the blocking value check is opt-in (the device-side one always runs)."""
    from deepep_cupy.config import Settings
    monkeypatch.delenv("DEEPEP_CUPY_CHECK_VALUES", raising=False)
    assert Settings().check_values is False
    monkeypatch.setenv("DEEPEP_CUPY_CHECK_VALUES", "1")
    assert Settings().check_values is True
    assert "check_values" in Settings.__doc__ and "default off" in Settings.__doc__


def test_bad_expert_id_record_is_invalid_input_naming_topk_idx():
    """Phase 24 (an expert id outside [-1, num_experts), found by the layout or low-latency kernel)
    raises DeepEPInvalid, not DeepEPTimeout, with the value, the argument and the range."""
    from deepep_cupy.errors import DeepEPInvalid, DeepEPTimeout
    from deepep_cupy.kernel_errors import PHASE_BAD_EXPERT_ID, PHASES, raise_if_error, team_to_global
    assert PHASE_BAD_EXPERT_ID == 24 and "topk_idx" in PHASES[24]
    with pytest.raises(DeepEPInvalid) as info:
        raise_if_error([2, 24, 256, 1], "dispatch", num_experts=256)
    msg = str(info.value)
    assert not isinstance(info.value, DeepEPTimeout)
    assert msg.startswith("dispatch: topk_idx: expected expert ids in [-1, 256), found 256 on rank 1"), msg
    with pytest.raises(DeepEPInvalid, match=r"\[-1, num_experts\), found -7 on rank 0"):
        raise_if_error([2, 24, -7, 0], "get_dispatch_layout")
    with pytest.raises(DeepEPInvalid, match=r"found 2147483647 or more \(clamped to int32\)"):
        raise_if_error([2, 24, 2**31 - 1, 0], "low_latency_dispatch", num_experts=64)
    with pytest.raises(DeepEPInvalid, match=r"found -2147483648 or less"):
        raise_if_error([2, 24, -2**31, 0], "low_latency_dispatch", num_experts=64)
    assert team_to_global([2, 24, 5, 1], [4, 6]) == [2, 24, 5, 6]     # the value stays, the rank maps


def test_device_input_errors_raise_once_with_the_launched_range(monkeypatch):
    """GpuBackend's input-check record (pinned memory on the GPU; a numpy stand-in here): a phase-24
    report raises DeepEPInvalid once, with num_experts when every launch since used the same one."""
    import numpy as np
    from deepep_cupy import kernel_errors
    from deepep_cupy.checks import DeviceInputErrors
    from deepep_cupy.errors import DeepEPInvalid

    class HostRecord(kernel_errors.PinnedErrorRecord):
        def __init__(self):
            self.record, self.team, self.label = np.zeros(4, np.int32), None, ""

    monkeypatch.setattr(kernel_errors, "PinnedErrorRecord", HostRecord)
    errors = DeviceInputErrors()
    errors.check("dispatch")                                   # clean: nothing raised
    errors.launched(256)
    errors.record.record[:] = [2, 24, 300, 1]                  # what the layout kernel writes
    with pytest.raises(DeepEPInvalid, match=r"^combine: topk_idx: expected expert ids in \[-1, 256\), found 300"):
        errors.check("combine")
    errors.check("combine")                                    # reported once, then cleared
    errors.launched(256)
    errors.launched(64)                                        # mixed ranges: the message stays generic
    errors.record.record[:] = [2, 24, -3, 0]
    with pytest.raises(DeepEPInvalid, match=r"\[-1, num_experts\), found -3 on rank 0"):
        errors.check("get_dispatch_layout")


def test_tuned_table_sees_a_retune_and_stats_at_most_once_a_second(monkeypatch, tmp_path):
    import os
    from deepep_cupy import config
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"dispatch": {"2": {"num_sms": 24}}}))
    monkeypatch.setattr(settings, "tuned_configs_path", str(path))
    monkeypatch.setattr(settings, "num_sms", None)
    assert ep.Buffer.get_dispatch_config(2).num_sms == 24
    path.write_text(json.dumps({"dispatch": {"2": {"num_sms": 32}}}))
    os.utime(path, ns=(0, 1))      # another version, whatever the file system's clock resolution
    assert ep.Buffer.get_dispatch_config(2).num_sms == 24     # within the second: not looked at again
    monkeypatch.setattr(config, "_TUNED_RECHECK_S", 0.0)
    assert ep.Buffer.get_dispatch_config(2).num_sms == 32     # looked at again: the re-tune is seen


def test_intranode_size_hint_counts_the_row_dtype():
    import ml_dtypes
    import numpy as np
    bf16 = ep.Buffer.get_intranode_size_hint(4096, 7168, 2)
    assert ep.Buffer.get_intranode_size_hint(4096, 7168, 2, dtype="bfloat16") == bf16
    assert ep.Buffer.get_intranode_size_hint(4096, 7168, 2, dtype=ml_dtypes.float8_e4m3fn) == bf16   # bf16 combine
    f32 = ep.Buffer.get_intranode_size_hint(4096, 7168, 2, dtype=np.float32)
    # float32 rows are twice as wide: the data part of the hint about doubles (metadata does not)
    assert 1.9 * bf16 < f32 < 2.0 * bf16
    with pytest.raises(ValueError, match="dtype: .*got int8"):
        ep.Buffer.get_intranode_size_hint(4096, 7168, 2, dtype=np.int8)


def test_timeout_ns_is_the_kernels_saturated_deadline(monkeypatch):
    """settings.timeout_ns: what every launch packs as its uint64 deadline; a timeout past 2^64 ns
    saturates instead of failing the parameter packer."""
    monkeypatch.setattr(settings, "timeout_seconds", 2.5)
    assert settings.timeout_ns == 2_500_000_000
    monkeypatch.setattr(settings, "timeout_seconds", 1e12)
    assert settings.timeout_ns == (1 << 64) - 1
