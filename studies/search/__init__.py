"""python -m studies.search"""
