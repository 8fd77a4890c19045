"""placeholder"""
NOTEBOOK = "x03"
EXERCISES = []
