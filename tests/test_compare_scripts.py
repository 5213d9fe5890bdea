"""scripts/compare_trees.sh and compare_table.py without a GPU: the table reads both benchmarks'
rows per tree and round, and the build step refuses a malformed tree spec before doing anything."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import compare_table  # noqa: E402

HT_LOG = """buffer: 284 MiB symmetric per rank
 SMs op                           median (p10-p90)                    DeepEP NVL GB/s
  24 dispatch_bf16                  {bf16:.2f} us (p10 155.74, p90 182.53)            691.5        345.8      0.48x    269.7   175.7     43.3
  24 dispatch_fp8_cached            {fp8:.2f} us (p10 105.89, p90 125.57)            554.5        277.3      0.42x    121.9    90.6     34.7
SUMMARY bench_intranode (DeepEP v1.2.1: dispatch FP8 258 us, BF16 353 us, combine 403 us)
  dispatch_bf16             169.2 us at 24 SMs  NVLink  345.8 GB/s
"""
LL_LOG = """low-latency: 128 tokens/rank, hidden 7168
{name:30s} {value:8.2f} us (p10 1.00, p90 2.00)       1.2x        100.0
  dispatch_fp8             24.6 us
"""


def test_table_has_a_value_per_tree_and_round_and_a_dash_where_a_log_is_missing(tmp_path, capsys):
    (tmp_path / "bi_old_1.log").write_text(HT_LOG.format(bf16=181.04, fp8=114.74))
    (tmp_path / "bi_old_2.log").write_text(HT_LOG.format(bf16=174.42, fp8=115.36))
    (tmp_path / "bi_new_1.log").write_text(HT_LOG.format(bf16=170.82, fp8=108.82))
    (tmp_path / "bl_new_2.log").write_text(LL_LOG.format(name="dispatch_fp8 (graph)", value=24.64))
    (tmp_path / "bi_other_1.log").write_text(HT_LOG.format(bf16=1.0, fp8=1.0))   # not asked for
    ops, table, rounds = compare_table.collect(tmp_path, ["old", "new"])
    assert rounds == [1, 2]
    assert ops == ["ht dispatch_bf16", "ht dispatch_bf16 host", "ht dispatch_fp8_cached", "ht dispatch_fp8_cached host",
                   "ll dispatch_fp8 (graph)"]
    assert table["ht dispatch_bf16"]["old"] == [(1, 181.04), (2, 174.42)]
    assert table["ht dispatch_fp8_cached host"]["new"] == [(1, 121.9)]
    assert table["ht dispatch_fp8_cached"]["new"] == [(1, 108.82)]
    assert table["ll dispatch_fp8 (graph)"]["new"] == [(2, 24.64)]
    assert compare_table.main(["compare_table.py", str(tmp_path), "old", "new"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("ht dispatch_bf16"))
    assert row.split()[2:] == ["181.0", "/", "174.4", "170.8", "/", "-"]
    host_table = lines[lines.index(next(line for line in lines if line.startswith("host us"))):]
    host_row = next(line for line in host_table if line.startswith("ht dispatch_bf16"))
    assert host_row.split()[2:] == ["269.7", "/", "269.7", "269.7", "/", "-"]


def test_rows_at_other_sm_counts_and_without_a_deepep_figure(tmp_path):
    # an op with no DeepEP baseline prints a blank "vs DeepEP" column: the host us is still found
    (tmp_path / "bi_new_1.log").write_text(
        "  16 dispatch_bf16                  300.00 us (p10 290.00, p90 310.00)            400.0        200.0"
        "                111.1   175.7     10.0\n"
        "  24 combine_newop                  50.00 us (p10 49.00, p90 51.00)            1.0        2.0"
        "                22.2   3.0     4.0\n")
    _, table, _ = compare_table.collect(tmp_path, ["new"])
    assert table["ht dispatch_bf16@16"]["new"] == [(1, 300.0)]
    assert table["ht dispatch_bf16@16 host"]["new"] == [(1, 111.1)]
    assert table["ht combine_newop host"]["new"] == [(1, 22.2)]


def test_no_rows_is_an_error(tmp_path):
    (tmp_path / "bi_old_1.log").write_text("Traceback: no GPU\n")
    assert compare_table.main(["compare_table.py", str(tmp_path), "old"]) == 1


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash and git")
@pytest.mark.parametrize("spec", ["noequals", "=HEAD", "name="])
def test_build_refuses_a_malformed_tree_spec(tmp_path, spec):
    done = subprocess.run(["bash", str(SCRIPTS / "compare_trees.sh"), "build", str(tmp_path / "trees"), spec],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 2
    assert f"expected NAME=REV, got {spec}" in done.stdout
    assert not (tmp_path / "trees").exists()
