"""The summary of ``scripts/gpu_check.sh``: one readable page from what its stages left
in OUT_DIR.

    python scripts/gpu_check_summary.py OUT_DIR [--total-seconds S]

Reads ``header.txt`` (machine and versions), ``stages.tsv`` (name, cap, exit status and
seconds of every stage), the pytest JUnit files (``<stage>.xml``) and the benchmarks'
JSON files; prints one line per stage (passed, FAILED with its exit status, or TIMED
OUT), the failed tests by name with the first line of their message, the figures, and a
last RESULT line; writes the same text to ``OUT_DIR/summary.txt``. Exits 0 when every
stage passed, 1 otherwise (2 when OUT_DIR holds no stage record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fairseq_knnvq.files import atomic_write_text  # noqa: E402

TIMEOUT_EXIT = 124  # coreutils timeout's exit status when the cap is reached


def read_stages(out: str) -> List[Dict[str, Any]]:
    stages = []
    with open(os.path.join(out, "stages.tsv")) as f:
        for line in f:
            if line.strip():
                name, cap, rc, seconds = line.rstrip("\n").split("\t")
                stages.append(dict(name=name, cap=int(cap), rc=int(rc), seconds=int(seconds)))
    return stages


def junit_results(path: str) -> Optional[Dict[str, Any]]:
    """Counts and the failed tests (``file::name`` and the first line of the message)."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                problem = case.find(kind)
                if problem is not None:
                    test_file = case.get("classname", "").replace(".", "/") + ".py"
                    message = (problem.get("message") or problem.text or "").strip().splitlines()
                    failed.append(f"{test_file}::{case.get('name')} ({kind}): {message[0][:200] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, failed=failed)


def load_json(out: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def figures(out: str) -> List[str]:
    lines = []
    topk = load_json(out, "topk_layout_cuda.json")
    if topk:
        for shape in topk["shapes"]:
            times = ", ".join(f"{name} {r['median_s'] * 1000:.3f} ms" for name, r in shape["results"].items())
            lines.append(
                f"top-{shape['k']} {shape['label']} ({shape['n']} x {shape['groups']} x {shape['columns']}): {times}"
            )
        lines.append(f"top-k layouts give torch.topk's values and indices: {topk['all_equal']}")
    q = load_json(out, "quantizer_cuda_quick.json")
    if q:
        for label, methods in q["ratios"]["vs_fairseq"].items():
            for method, r in methods.items():
                mem = "-" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
                wall = "-" if r["wall"] is None else f"{r['wall']:.3f}"
                lines.append(f"quantizer {label}: {method} / fairseq: time {wall}, peak memory {mem}")
        for t in q["targets"]:
            lines.append(f"quantizer target {t['target']}: {t['value']} {t['op']} {t['limit']}: {t['met']}")
    for kind in ("fp32", "fp16"):
        s = load_json(out, f"step_cuda_{kind}.json")
        if s:
            r, t, m = s["ratios_plugin_over_stock"], s["timing"], s["memory"]
            mem = "-" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
            lines.append(
                f"BASE step {s['batch']} x {s['seconds']:g} s {kind}: stock {t['stock']['median_s'] * 1000:.1f} ms, "
                f"plugin {t['plugin']['median_s'] * 1000:.1f} ms (x{r['wall']:.3f}); peak memory stock "
                f"{m['stock']['peak_bytes'] / 2**20:.0f} MiB, "
                f"plugin {m['plugin']['peak_bytes'] / 2**20:.0f} MiB (x{mem})"
            )
    return lines


def summarise(out: str, total_seconds: Optional[int] = None) -> Tuple[str, int]:
    """The summary's text and the exit status."""
    lines: List[str] = []
    header = os.path.join(out, "header.txt")
    if os.path.exists(header):
        with open(header) as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    stages = read_stages(out)
    lines.append("")
    lines.append(f"{'stage':22s} {'cap':>6s} {'time':>6s}  result")
    failed_tests: List[str] = []
    bad = []
    for stage in stages:
        tests = junit_results(os.path.join(out, stage["name"] + ".xml"))
        if stage["rc"] == 0:
            result = "passed"
        elif stage["rc"] == TIMEOUT_EXIT:
            result = f"TIMED OUT after {stage['cap']} s"
        else:
            result = f"FAILED (exit {stage['rc']}; log {stage['name']}.log)"
        if stage["rc"] != 0:
            bad.append(f"{stage['name']}: {result}")
        if tests is not None:
            result += (
                f" - {tests['tests']} tests: {tests['passed']} passed, {tests['failures']} failed, "
                f"{tests['errors']} errors, {tests['skipped']} skipped"
            )
            failed_tests += [f"{stage['name']}: {line}" for line in tests["failed"]]
        lines.append(f"{stage['name']:22s} {stage['cap']:>5d}s {stage['seconds']:>5d}s  {result}")
    if failed_tests:
        lines.append("")
        lines.append("failed tests:")
        lines += [f"  {line}" for line in failed_tests]
    figure_lines = figures(out)
    if figure_lines:
        lines.append("")
        lines.append("figures:")
        lines += [f"  {line}" for line in figure_lines]
    lines.append("")
    took = "" if total_seconds is None else f" in {total_seconds} s"
    if bad:
        lines.append(f"RESULT: {len(bad)} of {len(stages)} stages failed{took}: " + "; ".join(bad))
    else:
        lines.append(f"RESULT: all {len(stages)} stages passed{took}")
    return "\n".join(lines) + "\n", (1 if bad else 0)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the OUT_DIR gpu_check.sh wrote")
    parser.add_argument("--total-seconds", type=int, default=None, help="the whole run's time, for the RESULT line")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.out, "stages.tsv")):
        print(f"gpu_check_summary.py: {args.out} holds no stages.tsv; run scripts/gpu_check.sh first", file=sys.stderr)
        return 2
    text, status = summarise(args.out, args.total_seconds)
    atomic_write_text(os.path.join(args.out, "summary.txt"), text)
    print(text, end="")
    print(f"summary: {os.path.join(args.out, 'summary.txt')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
