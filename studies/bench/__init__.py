"""python -m studies.bench"""
