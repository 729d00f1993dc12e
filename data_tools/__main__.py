"""`python -m data_tools {synth,lrs3,validate} ...`"""
import sys

from .cli import main

sys.exit(main())
