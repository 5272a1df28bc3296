from django.urls import path

from chat import views

urlpatterns = [
    path("", views.index, name="index"),
    path("rooms/<str:room>/messages", views.post_message, name="post-message"),
]
