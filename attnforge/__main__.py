from attnforge.compiler.cli import main

raise SystemExit(main())
