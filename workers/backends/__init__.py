"""workers/backends"""
