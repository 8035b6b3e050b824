"""The project's root on sys.path: the tests import dynat, evaluate, bench and models from the checkout
itself (nothing is installed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
