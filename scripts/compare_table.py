#!/usr/bin/env python3
"""The tables of scripts/compare_trees.sh: per operation, a column per tree, one value per round: the
GPU medians, then (bench_intranode only) the host time of each call.

    python3 scripts/compare_table.py LOG_DIR TREE [TREE ...]

Reads LOG_DIR/bi_<tree>_<round>.log (bench_intranode.py) and bl_<tree>_<round>.log
(bench_low_latency.py); a round whose log has no table shows as "-".
"""

import collections
import pathlib
import re
import sys

# "  24 dispatch_bf16        212.94 us (p10 196.26, p90 222.05)   549.6   274.8   0.60x   353.7   175.7   34.4":
# bench_intranode's rows: SMs, op, median, then DeepEP GB/s, NVLink GB/s, vs DeepEP (blank for an op
# without a DeepEP figure), host us, SM MB, GB/s/SM: the host us is the third column from the end
HT_ROW = re.compile(r"^\s+(\d+) (\S+)\s+([\d.]+) us \(p10 [^)]*\)(.*)$")
# "dispatch_fp8 (graph)       24.64 us (p10 ...": bench_low_latency's rows (op, median)
LL_ROW = re.compile(r"^(\S.*?)\s{2,}([\d.]+) us \(p10")


def read_rows(path: pathlib.Path, prefix: str, pattern) -> dict:
    """op -> median (us) of one benchmark log, and "<op> host" -> its host us where the row has it
    (bench_intranode: the op is suffixed with @<SMs> unless it ran at 24 SMs)."""
    rows = {}
    for line in path.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if not m:
            continue
        if pattern is HT_ROW:
            sms, op, median, rest = m.groups()
            key = f"{prefix} {op}" + ("" if sms == "24" else f"@{sms}")
            rows[key] = float(median)
            tail = rest.split()
            if len(tail) >= 3:
                try:
                    rows[f"{key} host"] = float(tail[-3])
                except ValueError:
                    pass
        else:
            rows[f"{prefix} {m.group(1).strip()}"] = float(m.group(2))
    return rows


def collect(log_dir: pathlib.Path, trees: list) -> tuple:
    """(ops in first-seen order, {op: {tree: [median per round or None]}}, rounds)."""
    logs = collections.defaultdict(dict)          # (kind, tree) -> {round: path}
    for path in log_dir.glob("b[il]_*_*.log"):
        kind, rest = path.stem.split("_", 1)
        tree, _, rnd = rest.rpartition("_")
        if tree in trees and rnd.isdigit():
            logs[(kind, tree)][int(rnd)] = path
    rounds = sorted({r for per in logs.values() for r in per})
    ops, table = [], collections.defaultdict(lambda: collections.defaultdict(list))
    for kind, prefix, pattern in (("bi", "ht", HT_ROW), ("bl", "ll", LL_ROW)):
        for tree in trees:
            for rnd in rounds:
                path = logs.get((kind, tree), {}).get(rnd)
                rows = read_rows(path, prefix, pattern) if path else {}
                for op, value in rows.items():
                    if op not in ops:
                        ops.append(op)
                    table[op][tree].append((rnd, value))
    return ops, table, rounds


def main(argv) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    log_dir, trees = pathlib.Path(argv[1]), argv[2:]
    ops, table, rounds = collect(log_dir, trees)
    if not ops:
        print(f"no benchmark rows under {log_dir}")
        return 1
    width = max(12, 8 * len(rounds) + 2)
    for title, chosen in (("GPU medians (us)", [op for op in ops if not op.endswith(" host")]),
                          ("host us per call (median)", [op[:-5] for op in ops if op.endswith(" host")])):
        if not chosen:
            continue
        print(f"{title}, rounds {', '.join(map(str, rounds))} per tree")
        print("op".ljust(36) + "".join(t.rjust(width) for t in trees))
        for op in chosen:
            key = op if title.startswith("GPU") else op + " host"
            cells = []
            for tree in trees:
                by_round = dict(table[key][tree])
                cells.append(" / ".join(f"{by_round[r]:.1f}" if r in by_round else "-" for r in rounds))
            print(op.ljust(36) + "".join(c.rjust(width) for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
