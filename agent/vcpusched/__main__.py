from vcpusched.cli import main

raise SystemExit(main())
