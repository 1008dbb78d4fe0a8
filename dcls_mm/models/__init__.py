"""dcls_mm.models"""
