import sys

from rag_capg.cli import main

sys.exit(main())
