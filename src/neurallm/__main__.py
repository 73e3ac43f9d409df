from neurallm.cli import main

raise SystemExit(main())
