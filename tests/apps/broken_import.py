"""
A module that fails to import, as new code with a bug would.
"""

raise RuntimeError("this release is broken")
