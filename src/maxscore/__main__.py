from maxscore.cli import main

raise SystemExit(main())
