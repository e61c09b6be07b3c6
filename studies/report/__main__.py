import sys

from studies.report.build import main

if __name__ == "__main__":
    sys.exit(main())
