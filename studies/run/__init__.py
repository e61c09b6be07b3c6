"""python -m studies.run"""
