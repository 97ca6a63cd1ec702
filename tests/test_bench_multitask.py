"""bench.multitask: the fan-out gives each Bypass's own output, and the table reports it."""

from bench import multitask


def test_quick_run_fans_out_exactly_and_writes_its_table(tmp_path):
    result = multitask.main(["--quick", "--out-dir", str(tmp_path)])
    checks = [r for r in result["rows"] if r["case"] == "check"]
    assert [c["k"] for c in checks] == [1, 2]
    assert all(c["fanout_max_abs_diff"] < 1e-4 for c in checks)
    assert checks[1]["outputs_differ_by"] > 1e-3  # two Bypasses that agree would prove nothing
    cases = {r["case"] for r in result["rows"] if r["case"] != "check"}
    assert cases == {"bypass: separate", "bypass: fan-out", "bypass: routed batch", "res-tuning: separate", "res-tuning: routed batch"}
    table = (tmp_path / "multitask_tiny_cpu_depth2.md").read_text()
    assert "| 2 |" in table and "not measured at K = 10" in table
