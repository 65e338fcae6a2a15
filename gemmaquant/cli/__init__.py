"""The command line, and nothing else: typer commands that check their arguments, call the library and
render what it returns with rich. No quantization, evaluation or file format logic lives here.

    app         the typer app, `main` (exit codes: GemmaQuantError 2, OutputError 3), quantize/eval/imatrix
    compare     `compare`: drift tables of artifacts against their base, `--card` updates
    inspect     `inspect`: render what evaluate.inspect reads
    plan_view   `quantize --dry-run`'s per-tensor plan and the final summary
    options     options several commands share
    progress    the progress display of long runs (bytes written, calibration layers)

`python -m gemmaquant.cli` runs it (`gemmaquant` is the installed script).
"""
