import sys

from dropless.cli import main

sys.exit(main())
