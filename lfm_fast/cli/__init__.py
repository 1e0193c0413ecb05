"""`lfm-fast` command line: demo | train-ae | prepare | train | sample | export | calibrate | eval | presets | convert.

One module per command, its parser (`add_parser`) and its handler (`run`) side by side; `app` assembles the parser,
dispatches and ends every command the same way; `common` holds the flags several commands share, `recipe` the
sampling recipe `sample`, `export` and `calibrate` read from a checkpoint and flags. Importing it imports no torch:
`lfm-fast --help` answers in a fraction of a second.
"""

from lfm_fast.cli.app import entry, main  # noqa: F401 (the console entry point; main(argv) runs a command in-process)
