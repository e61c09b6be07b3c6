"""python -m studies.report"""
