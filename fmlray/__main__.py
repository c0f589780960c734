import sys

from fmlray.cli import main

sys.exit(main())
