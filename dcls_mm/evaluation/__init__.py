"""dcls_mm.evaluation"""
