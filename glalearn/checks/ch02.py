"""placeholder"""
NOTEBOOK = "x02"
EXERCISES = []
