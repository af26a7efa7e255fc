from edgetune.cli import main

raise SystemExit(main())
