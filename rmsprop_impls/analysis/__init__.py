"""Reading what asv recorded: running the suite, loading results, regressions, plots, tables, report, dashboard."""
