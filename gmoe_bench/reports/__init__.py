"""Reports: tables and plots from summary.json files."""
