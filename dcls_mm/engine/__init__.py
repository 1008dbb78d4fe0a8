"""dcls_mm.engine"""
