import sys

from studies.search.orchestrate import main

if __name__ == "__main__":
    sys.exit(main())
