"""
A module that calls sys.exit() at import, as a misconfigured application might.
"""

import sys

sys.exit(3)
