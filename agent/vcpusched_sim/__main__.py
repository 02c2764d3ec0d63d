from vcpusched_sim.bench import main

raise SystemExit(main())
