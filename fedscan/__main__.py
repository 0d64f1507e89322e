from fedscan.cli import main

raise SystemExit(main())
