from lfm_fast.cli import main

raise SystemExit(main())
