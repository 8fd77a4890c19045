"""placeholder"""
NOTEBOOK = "x04"
EXERCISES = []
