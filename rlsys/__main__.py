from rlsys.cli import main

raise SystemExit(main())
