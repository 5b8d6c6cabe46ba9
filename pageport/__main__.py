from pageport.entrypoints.cli import main

raise SystemExit(main())
