from lfm_fast.cli import entry

entry()
