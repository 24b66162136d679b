"""Prints those of the given pip distribution names whose module cannot be imported here, space-separated.
(The import name is the distribution name except where IMPORT_NAMES says otherwise.)"""
import importlib.util
import sys

IMPORT_NAMES = {"scikit-learn": "sklearn"}

missing = [name for name in sys.argv[1:] if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None]
print(" ".join(missing))
