"""Prints those of the given module names that cannot be imported here, space-separated.
(Each name is both the pip distribution and the import name for the packages the Makefile lists.)"""
import importlib.util
import sys

print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
