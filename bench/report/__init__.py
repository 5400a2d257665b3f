"""unmask.bench.report: everything that reads the store and shows or checks its numbers.

* :mod:`.leaderboard`, :mod:`.tables` -- the main table and its sections (Markdown, CSV);
* :mod:`.html` -- the self-contained HTML report and the evidence pages;
* :mod:`.curves`, :mod:`.curve_report` -- security curves (robust accuracy against eps);
* :mod:`.certify_table` -- the certified-bounds table of ``docs/certified.md``;
* :mod:`.export` -- RobustBench JSON, CSV, Parquet;
* :mod:`.check` -- paired regression checks against a baseline (``unmask check``);
* :mod:`.run_compare` -- two runs side by side with paired tests (``unmask compare``);
* :mod:`.testing` -- the pytest helper (``assert_robust_accuracy``).
"""
