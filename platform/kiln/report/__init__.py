"""kiln-report: a run's (or a sweep's) metrics.jsonl -> PNG curves and a text summary.

series.py reads run and sweep directories (a resumed run's repeated steps count once), plots.py
draws the pictures, summary.py writes the text; kiln/cli/report.py is the command."""
