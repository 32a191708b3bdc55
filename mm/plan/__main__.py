from mm.plan.cli import main

raise SystemExit(main())
