"""placeholder"""
NOTEBOOK = "x05"
EXERCISES = []
